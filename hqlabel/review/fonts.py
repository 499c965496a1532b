"""Fonts for the text drawn on overlays and contact sheets (class names, image ids), in any script.

Pillow draws a string with one font, and no single common font covers every script (DejaVu Sans has Latin,
Greek, Cyrillic, Arabic, Hebrew; CJK is in others, e.g. Debian's ``fonts-noto-cjk`` or
``fonts-droid-fallback``). So text is drawn in runs: ASCII in the default sans-serif font, every other
character in a font that fontconfig (``fc-list``) says has its glyph. Without fontconfig, or without a font
for a character, Pillow's built-in font is used (that character then shows as a box) and a warning names a
font package to install, once per character.
"""

from __future__ import annotations

import functools
import logging
import subprocess

from PIL import ImageDraw, ImageFont

logger = logging.getLogger(__name__)

SIZE = 11  # pixels: the caption size of overlays and contact sheets
FONT_PACKAGES = "Debian: apt-get install fonts-noto-core fonts-noto-cjk (or the smaller fonts-droid-fallback)"


def _fontconfig(*args: str) -> list[str]:
    """The output lines of a fontconfig command, or [] where fontconfig is missing or fails."""
    try:
        done = subprocess.run(list(args), capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in done.stdout.splitlines() if line.strip()]


@functools.cache
def default_font_file() -> str | None:
    """fontconfig's sans-serif font file (e.g. DejaVuSans.ttf), or None."""
    found = _fontconfig("fc-match", "--format=%{file}", "sans-serif")
    return found[0] if found and found[0].lower().endswith((".ttf", ".otf", ".ttc")) else None


@functools.cache
def font_file_for(char: str) -> str | None:
    """A font file that has a glyph for ``char``: the default one if it does, else the first of fontconfig's
    (sorted, so the choice is stable); None (with a warning, once) where no installed font has it."""
    listed = _fontconfig("fc-list", f":charset={ord(char):x}", "file")
    files = sorted(
        line.rstrip(":").strip()
        for line in listed
        if line.rstrip(":").lower().endswith((".ttf", ".otf", ".ttc"))
    )
    default = default_font_file()
    if default in files:
        return default
    if files:
        return files[0]
    logger.warning(
        "no installed font has a glyph for %r (U+%04X); install one (%s)", char, ord(char), FONT_PACKAGES
    )
    return None


@functools.cache
def _load(path: str | None, size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    if path is not None:
        try:
            return ImageFont.truetype(path, size)
        except OSError:
            pass
    return ImageFont.load_default(size)


def text_runs(text: str, size: int = SIZE) -> list[tuple[str, ImageFont.FreeTypeFont | ImageFont.ImageFont]]:
    """``text`` cut into runs of characters that one font draws, with that font, in order."""
    runs: list[tuple[str, str | None]] = []
    for char in text:
        path = default_font_file() if char.isascii() else font_file_for(char) or default_font_file()
        if runs and runs[-1][1] == path:
            runs[-1] = (runs[-1][0] + char, path)
        else:
            runs.append((char, path))
    return [(run, _load(path, size)) for run, path in runs]


def text_box(
    draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, size: int = SIZE
) -> tuple[float, ...]:
    """``(left, top, right, bottom)`` of ``text`` drawn at ``xy`` by ``draw_text``."""
    x, y = xy
    boxes = []
    for run, font in text_runs(text, size):
        left, top, right, bottom = draw.textbbox((x, y), run, font=font)
        boxes.append((left, top, right, bottom))
        x += draw.textlength(run, font=font)
    if not boxes:
        return (xy[0], xy[1], xy[0], xy[1])
    return (boxes[0][0], min(b[1] for b in boxes), max(x, boxes[-1][2]), max(b[3] for b in boxes))


def draw_text(
    draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, fill: tuple[int, ...], size: int = SIZE
) -> None:
    """Draw ``text`` at ``xy`` (top-left), each run in a font that has its glyphs."""
    x, y = xy
    for run, font in text_runs(text, size):
        draw.text((x, y), run, fill=fill, font=font)
        x += draw.textlength(run, font=font)
