"""Text in any script on overlays and contact sheets: each run of characters in a font that has them."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image, ImageDraw

from hqlabel.review.fonts import draw_text, font_file_for, text_runs
from hqlabel.review.render import overlay_masks


@pytest.fixture(scope="module")
def cjk_font() -> str:
    if shutil.which("fc-list") is None:
        pytest.skip("no fontconfig")
    path = font_file_for("猫")
    if path is None:
        pytest.skip("no installed font has CJK glyphs (Debian: fonts-droid-fallback or fonts-noto-cjk)")
    return path


def test_each_run_gets_a_font_with_its_glyphs(cjk_font):
    runs = text_runs("cat 猫 0.91")
    assert [text for text, _ in runs] == ["cat ", "猫", " 0.91"]
    assert runs[1][1].path == cjk_font and runs[0][1].path != cjk_font  # a TrueType font each


def test_a_cjk_label_is_drawn_with_its_glyph(cjk_font):
    """The glyph drawn is the CJK font's, not the box a Latin-only font draws for a missing glyph."""

    def ink(text: str, font=None) -> np.ndarray:
        canvas = Image.new("L", (40, 20), 0)
        draw = ImageDraw.Draw(canvas)
        if font is None:
            draw_text(draw, (2, 2), text, fill=(255,))
        else:
            draw.text((2, 2), text, fill=255, font=font)
        return np.asarray(canvas) > 0

    ((_, cjk),) = text_runs("猫")
    assert np.array_equal(ink("猫"), ink("猫", cjk))
    assert not np.array_equal(ink("猫"), ink("猫", text_runs("a")[0][1]))  # the Latin font lacks it
    overlay = overlay_masks(np.zeros((40, 60, 3), np.uint8), [], boxes=[(5, 15, 50, 35)], captions=["猫 0.9"])
    assert overlay.size == (60, 40)
